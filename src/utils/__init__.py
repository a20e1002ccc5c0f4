"""Run plumbing shared by the entry points: config resolvers, loggers, checkpoints, metric files."""

from src.utils.resolvers import register_resolvers

register_resolvers()
