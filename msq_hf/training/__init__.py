"""Training: the pruning schedule (pure), Hessian sensitivity, the controller and the Trainer glue."""
