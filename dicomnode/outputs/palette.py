"""Display colours of findings, in a module of their own.

The preview command draws findings in these colours too; keeping them apart from the
detection code lets it start without importing torch.
"""

from __future__ import annotations

# Warm colours that stand out against lung and against the lung masks' greens.
PALETTE = (
    [255, 200, 0],
    [255, 110, 0],
    [230, 40, 60],
    [220, 0, 200],
    [0, 200, 255],
    [150, 90, 255],
)
