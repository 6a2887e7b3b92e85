"""What MLflow runs to load an mlexp classifier (a model from code: nothing is unpickled).

`mlexp.training.logged_models.save_pyfunc` names this file as the model's code; MLflow copies it into
the model and runs it when the model is loaded or served.
"""

import mlflow.models

from mlexp.training.logged_models import ImageClassifier

mlflow.models.set_model(ImageClassifier())
