"""One LightningModule per objective, and the multi-task module that runs them together."""
