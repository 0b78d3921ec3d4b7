"""The Llama-style decoder and its FLOPs count."""
