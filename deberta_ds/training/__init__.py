"""DeepSpeed training of the RTD pair: run config, engines, checkpoints, metrics, the loop."""
