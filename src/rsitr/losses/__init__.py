"""Losses. Each returns a tensor; methods collect them into a dict of named ``*_loss`` terms."""

from rsitr.losses.consistency import score_distribution_kl
from rsitr.losses.contrastive import multi_positive_infonce, positives_from_ids
from rsitr.losses.triplet import hinge_triplet

__all__ = ["hinge_triplet", "multi_positive_infonce", "positives_from_ids", "score_distribution_kl"]
