"""Pure math, torch only: schedules, posterior, parametrisations, losses, samplers, moment matching.

Nothing here imports Ray, Hydra, MLflow or rayflow's config: functions take tensors and numbers.
"""
