"""AWS: the same training, model and shadow test run as SageMaker jobs and endpoints.

One concern per module (none imports boto3 or the SageMaker SDK at package import, so the
training container and the local stack import `environment` without either):

    config          AwsConfig, SageMakerTrainConfig, DeployConfig, ShadowTestConfig
    session         AwsContext: boto3 session/clients (moto or AWS), bucket, role, tags; request checks
    s3              folders to and from S3
    hyperparameters TrainConfig <-> SageMaker hyperparameters (the one mapping)
    environment     inside the job: SM_* environment -> TrainConfig, model -> SM_MODEL_DIR
    container       the job's image and requirements.txt (torch <-> fbgemm-gpu <-> torchrec), source dir
    training        the training job through SDK v2 (PyTorch estimator) or v3 (ModelTrainer + Torchrun)
    mlflow          tracking URI kinds; find or create a SageMaker managed MLflow tracking server
    deploy          model, endpoint config, endpoint, waiting, smoke invocation
    shadow          shadow variants (endpoint config) and inference experiments; promotion
    results         data capture from S3 and CloudWatch metrics per variant -> the shadow report
    cleanup         delete everything carrying the project tag
    cli             how the sagemaker_* commands report a failure (one line; --debug: the traceback)
"""
