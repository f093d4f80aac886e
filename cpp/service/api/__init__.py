"""HTTP layer of the job service: dependencies and routes."""
