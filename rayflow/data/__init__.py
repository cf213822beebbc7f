"""Data layer: pure numpy transforms (`transforms`) and captioned shapes scenes (`shapes`), the Arrow block
format (`blocks`), Ray Data sources (`sources`), text conditioning (`text`) and training pipeline builders
(`pipeline`). Import the submodules; this package imports nothing itself so that `rayflow.data.transforms` and
`rayflow.data.shapes` stay free of Ray."""
