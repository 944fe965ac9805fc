"""What the model reads: needle-in-a-haystack prompts, tokenizers and training datasets."""
