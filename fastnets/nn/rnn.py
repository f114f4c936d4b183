"""LSTM, GRU, RNN and their cells: torch.nn's classes (same constructor arguments, parameter
names and layout, return values, flatten_parameters), forward through fastnets.ops.rnn.

Each subclasses the torch.nn class it replaces, so a torch model's state_dict loads as is and
swap() changes a module's class in place without touching its parameters."""
from __future__ import annotations

from torch import nn

from .. import ops


class _FastRNNBase:
    """forward for LSTM / GRU / RNN: torch's argument handling, fastnets' kernels."""

    def flatten_parameters(self) -> None:
        # cuDNN wants one contiguous weight buffer; the fastnets kernels read each weight
        # where it is, so there is nothing to flatten (kept for API compatibility).
        return None

    def forward(self, input, hx=None, *, lengths=None):
        """torch's forward; `lengths` (fastnets): per-row lengths of a padded batch, any order."""
        return ops.rnn(self.mode, input, hx, self._flat_weights, self.bias, self.num_layers, self.dropout,
                       self.training, self.bidirectional, self.batch_first, proj_size=self.proj_size,
                       lengths=lengths)


class LSTM(_FastRNNBase, nn.LSTM):
    """``torch.nn.LSTM`` (proj_size, packed sequences, bidirectional, dropout) on fastnets' kernels."""


class GRU(_FastRNNBase, nn.GRU):
    """``torch.nn.GRU`` on fastnets' kernels."""


class RNN(_FastRNNBase, nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) on fastnets' kernels."""


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` on fastnets' fused step kernel."""

    def forward(self, input, hx=None):
        return ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(nn.GRUCell):
    """``torch.nn.GRUCell`` on fastnets' fused step kernel."""

    def forward(self, input, hx=None):
        return ops.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class RNNCell(nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) on fastnets' fused step kernel."""

    def forward(self, input, hx=None):
        cell = ops.rnn_tanh_cell if self.nonlinearity == "tanh" else ops.rnn_relu_cell
        return cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
