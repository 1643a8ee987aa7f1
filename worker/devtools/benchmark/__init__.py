"""`mailgun-sync bench`: the worker against what a user would write instead, on one workload."""
