"""Token shards (Megatron MMIDIDX layout), sample building, masking and distributed sampling."""
