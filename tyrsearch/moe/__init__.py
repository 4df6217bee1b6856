"""Mixture-of-Experts models: MoEfication of dense decoders (`moefy`), STUN (`tyrsearch.moe.stun`), and their
Python API (`tyrsearch.moe.api`: `stun`, `moefy`, `distill`, re-exported as `tyrsearch.stun` ...)."""

from tyrsearch.moe.moefy import MoefyConfig, active_params, check_counts, check_moefiable, moefy, save_moe

__all__ = ["MoefyConfig", "active_params", "check_counts", "check_moefiable", "moefy", "save_moe"]
