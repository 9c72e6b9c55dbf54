"""Example MoE models written in plain PyTorch (importable as `moecc.examples`)."""
