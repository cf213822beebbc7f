"""Data layer: pure numpy transforms (`transforms`), Ray Data sources (`sources`) and training
pipeline builders (`pipeline`). Import the submodules; this package imports nothing itself so that
`rayflow.data.transforms` stays free of Ray."""
