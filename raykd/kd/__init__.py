"""KD training: the loss (`raykd.kd.losses`, pure torch) and, later, batching and the Ray Train worker.

Import-light on purpose: importing `raykd.kd` loads no torch; import `raykd.kd.losses` where it is needed.
"""
