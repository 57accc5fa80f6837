"""Forward passes without training: batched inference, test-set evaluation, cached frozen features and activations."""
