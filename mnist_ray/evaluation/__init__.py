"""The evaluation stage: predictions -> metrics and figures, and a model's accuracy on inputs
it was not trained on.
"""
