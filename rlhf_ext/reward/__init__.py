"""Reward modelling: the ensemble trainer, the artifact it writes, and the pipeline that scores rollouts."""
