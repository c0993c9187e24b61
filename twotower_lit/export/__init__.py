"""The framework-light model artifact: `format` reads it with torch alone, `writer` makes it from
a trained model, `package` wraps it in SageMaker's model.tar.gz layout."""
