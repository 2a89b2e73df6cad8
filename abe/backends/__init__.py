"""Backend families of Abstract Backend."""
