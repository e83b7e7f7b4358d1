"""End-to-end training recipes behind `kerasllm train ...`: data, tokenizer, model, fit, save."""
