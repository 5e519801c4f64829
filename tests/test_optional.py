"""The qlora extra's libraries import without reaching the network: bitsandbytes 0.50 asks the
hub for a CPU kernel at import (and warns when it cannot have it); qdiablo.optional stops both."""

import subprocess
import sys

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

PROBE = """
import socket, sys
tried = []
def refuse(*args, **kwargs):
    tried.append(args)
    raise OSError("this test allows no network")
socket.create_connection = refuse
socket.getaddrinfo = refuse
from qdiablo.optional import prepare_trainer_imports, loaded
assert loaded("bitsandbytes") is None
prepare_trainer_imports()      # what AdapterTrainer does before transformers' Trainer imports PEFT
assert loaded("peft") is not None and loaded("bitsandbytes") is not None
import kernels                  # hidden only while bitsandbytes imported
print("network attempts:", len(tried))
"""


def test_peft_and_bitsandbytes_import_without_the_hub():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "network attempts: 0" in proc.stdout
    assert "kernels-community" not in proc.stderr and "Failed to load" not in proc.stderr, (
        proc.stderr
    )


def test_a_diablo_run_never_imports_peft_for_an_isinstance_check():
    code = (
        "import sys\nfrom torch import nn\nfrom qdiablo.adapters.lora import is_peft_model\n"
        "assert not is_peft_model(nn.Linear(2, 2))\nprint('peft' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_from_pretrained_still_works_after_bitsandbytes_was_imported_quietly(tiny_model_dir):
    """Hiding `kernels` while bitsandbytes imports must not leave transformers believing it is
    missing (its probe is cached): from_pretrained uses hub kernels by default."""
    from transformers import AutoModelForCausalLM

    from qdiablo.optional import import_bitsandbytes, prepare_trainer_imports

    prepare_trainer_imports()
    import_bitsandbytes()
    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir) is not None
