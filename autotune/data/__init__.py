"""Training data: reading QA files into pairs (parsing.py), tokens and labels (encoding.py), a run's data
(prepare.py). Import the module you need: importing one does not load the others."""
