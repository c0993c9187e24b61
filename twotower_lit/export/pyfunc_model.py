"""The MLflow model file of the registered pyfunc (MLflow's models-from-code): MLflow copies this
file into the logged model and runs it when the model is loaded, so the model is our code and the
export's files, never a pickled object."""
import mlflow.models

from twotower_lit.export.pyfunc import ExportedModelPyfunc

mlflow.models.set_model(ExportedModelPyfunc())
