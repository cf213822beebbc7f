"""Small files shipped with rayflow: the CPU demo's teacher (state_dict only; see README for how it was made)."""
