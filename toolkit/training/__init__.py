"""Fine-tuning with Accelerate: recipes, data, the loop, and tracking of the attention shift."""
