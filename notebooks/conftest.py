"""``pytest --nbval-lax notebooks`` (part of ``make test``) runs each notebook in
a kernel that talks over local IPC sockets, as scripts/run_notebooks.py does:
nbval starts its kernels with jupyter_client's default TCP transport, which
opens ports on localhost and makes ipykernel warn that the traffic is not
encrypted. The sockets live in a private temporary directory, removed at exit."""
import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import nbval.kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
try:
    from run_notebooks import ipc_kernel_manager
finally:
    sys.path.pop(0)

_SOCKETS = Path(tempfile.mkdtemp(prefix="tcx_nbval_"))
atexit.register(shutil.rmtree, _SOCKETS, ignore_errors=True)
nbval.kernel.KernelManager = ipc_kernel_manager(_SOCKETS)
