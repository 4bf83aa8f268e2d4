"""Training: its configuration, learning-rate schedule, distributed set-up and the trainer.

Nothing used at inference imports this package: loading a bundle never pulls in training code.
"""
