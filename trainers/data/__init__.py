"""Built-in data sets (all offline except CIFAR-10's first download)."""
from trainers.data.base import EpochSeededSampler, TensorDataModule, TensorSplit
from trainers.data.cifar10 import CIFAR10DataModule
from trainers.data.digits import DigitsDataModule
from trainers.data.hmm_sequences import HMMSequenceDataModule
from trainers.data.mnist1d import MNIST1DDataModule
from trainers.data.synthetic import SyntheticDataModule

__all__ = ["TensorDataModule", "TensorSplit", "EpochSeededSampler", "DigitsDataModule",
           "MNIST1DDataModule", "SyntheticDataModule", "CIFAR10DataModule",
           "HMMSequenceDataModule"]
