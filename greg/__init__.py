"""greg: Gradient-Regularized OOD detection (GReg / GReg+), SAM-only-norm fine-tuning, Hessian alignment."""

__version__ = "0.1.0"
