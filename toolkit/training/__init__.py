"""Fine-tuning with Accelerate: recipes, data, the training loop, and tracking of the attention shift."""
