"""The run around the model: callbacks, checkpoints, requeue, cost accounting, predictions, pictures."""
