"""check_import: the imported graph against the torch module, whatever container its outputs come in."""
import torch

from nnforge.frontend import check_import, import_model


class TwoOutputs(torch.nn.Module):
    """Returns a dict, as transformers' ModelOutput (an OrderedDict) does: the hidden state, then its pool."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 6)

    def forward(self, x):
        h = self.fc(x)
        return {"last_hidden_state": h, "pooler_output": h.mean(1)}


def test_check_import_flattens_dict_outputs_as_the_export_does():
    torch.manual_seed(0)
    model, x = TwoOutputs().eval(), (torch.randn(2, 4),)
    graph, _ = import_model(model, x)
    assert len(graph.outputs) == 2
    assert check_import(model, graph, x)["cosine_min"] > 0.999999


def test_check_import_takes_a_transformers_model_output():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class Wrapped(TwoOutputs):
        def forward(self, x):
            return BaseModelOutputWithPooling(**super().forward(x))

    torch.manual_seed(0)
    model, x = Wrapped().eval(), (torch.randn(2, 4),)
    graph, _ = import_model(model, x)
    assert check_import(model, graph, x)["cosine_min"] > 0.999999
