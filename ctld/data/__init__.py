"""Reading CT series, building WebDataset shards and streaming aligned patch pairs."""
