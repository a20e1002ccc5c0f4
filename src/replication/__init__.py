"""Folder-level replication work: features of image folders and their cache, the analysis of generations against
training images, its report, folder FID and CLIP score, and the pieces shared by the study aggregates.

The search and the statistics it reports are pure functions in `src.metrics` (`search`, `replication`).
"""
