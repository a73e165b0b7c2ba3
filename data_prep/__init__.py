"""Offline data preparation: tokenizer training, tokenisation into Megatron-layout shards, tools."""
