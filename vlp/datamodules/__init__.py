"""One file per data source, and the multi-task data module that samples between them."""
