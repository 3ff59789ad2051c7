"""Fine-tuning jobs: submitted over the API, run by separate worker processes, state in SQL.

``files`` holds uploaded datasets, ``manager`` the job lifecycle (submit, claim, progress,
finish, cancel, recover), ``gate`` the promotion decision, ``runner`` one job's work,
``worker`` the worker process loop and ``supervisor`` the pool the service starts.
"""
