"""Built-in data sets (all offline except CIFAR-10's first download)."""
from shiftlab.trainers.data.base import EpochSeededSampler, TensorDataModule, TensorSplit
from shiftlab.trainers.data.cifar10 import CIFAR10DataModule
from shiftlab.trainers.data.digits import DigitsDataModule
from shiftlab.trainers.data.hmm_sequences import HMMSequenceDataModule
from shiftlab.trainers.data.mnist1d import MNIST1DDataModule
from shiftlab.trainers.data.synthetic import SyntheticDataModule

__all__ = ["TensorDataModule", "TensorSplit", "EpochSeededSampler", "DigitsDataModule",
           "MNIST1DDataModule", "SyntheticDataModule", "CIFAR10DataModule",
           "HMMSequenceDataModule"]
