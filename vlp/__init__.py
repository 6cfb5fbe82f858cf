"""Multi-task vision-language pre-training on Lightning."""
