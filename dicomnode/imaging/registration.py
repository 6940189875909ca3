"""Rigid registration of a prior CT onto the current one, on the lungs (SimpleITK).

Two chest CTs of one patient months apart differ by where the patient lay on the
table (a shift of centimetres, a small rotation), by the table and the arms in the
field of view, and by the breath held. Registering on the lungs alone makes the first
two irrelevant: each scan's lungs are found by threshold (air inside the body), the
prior's lung centroid is moved onto the current one's, and a rigid transform
(rotation and translation) is then refined by mean squares on the clipped HU, sampled
within the current lungs, coarse to fine. Nodule centres found on the prior are then
carried into the current scan's coordinates to be matched with today's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk  # noqa: N813  (the name its documentation uses)
from scipy import ndimage

from dicomnode.imaging.volume import Volume

LUNG_HU = -400.0  # air and lung parenchyma lie below, soft tissue above
CLIP_HU = (-1000.0, 200.0)
COARSE_MM = 4.0  # the lungs are found, and the registration starts, on this grid


@dataclass(frozen=True)
class RigidTransform:
    """Maps current-scan points (LPS, mm) to prior-scan points: ``prior = R @ current + t``.

    Attributes
    ----------
    rotation : np.ndarray
        ``(3, 3)`` rotation matrix.
    translation : np.ndarray
        ``(3,)`` in mm.
    metric : float
        The final mean squared HU difference within the lungs (lower is better).
    """

    rotation: np.ndarray
    translation: np.ndarray
    metric: float

    def to_current(self, prior_points: np.ndarray) -> np.ndarray:
        """Return prior-scan points in the current scan's coordinates.

        Parameters
        ----------
        prior_points : np.ndarray
            ``(n, 3)`` LPS mm on the prior.

        Returns
        -------
        np.ndarray
            ``(n, 3)`` LPS mm on the current scan.
        """
        points = np.asarray(prior_points, dtype=float).reshape(-1, 3)
        return (points - self.translation) @ self.rotation  # R^T (p - t), row-wise

    @property
    def rotation_degrees(self) -> float:
        """Return the rotation's angle, in degrees."""
        cosine = (float(np.trace(self.rotation)) - 1.0) / 2.0
        return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def _image(volume: Volume) -> sitk.Image:
    """Return the volume's clipped HU as a SimpleITK image in patient coordinates."""
    clipped = np.clip(volume.pixels, *CLIP_HU).astype(np.float32)
    image = sitk.GetImageFromArray(clipped)  # (slices, rows, columns) -> x columns, z slices
    row_spacing, column_spacing = volume.pixel_spacing
    image.SetSpacing((float(column_spacing), float(row_spacing), float(volume.slice_spacing)))
    image.SetOrigin(tuple(float(v) for v in volume.positions[0]))
    axes = np.stack([volume.row_direction, volume.column_direction, volume.normal], axis=1)
    image.SetDirection(tuple(float(v) for v in axes.ravel()))
    return image


def _coarse(image: sitk.Image) -> sitk.Image:
    """Resample onto an isotropic COARSE_MM grid (linear), keeping the orientation."""
    size = [
        max(1, round(n * s / COARSE_MM))
        for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)
    ]
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        (COARSE_MM,) * 3,
        image.GetDirection(),
        CLIP_HU[0],
        sitk.sitkFloat32,
    )


def lung_mask(image: sitk.Image) -> sitk.Image:
    """Return the lungs of a coarse image: air below LUNG_HU not reaching a slice's edge.

    Parameters
    ----------
    image : sitk.Image
        Clipped HU on the coarse grid.

    Returns
    -------
    sitk.Image
        uint8, 1 in the (at most two) largest enclosed air regions.
    """
    array = sitk.GetArrayFromImage(image)
    air = array < LUNG_HU
    labels, count = ndimage.label(air)
    if count == 0:
        raise ValueError("no air in the scan")
    # The air around the body reaches the edge of every slice; the lungs do not (they
    # may reach the first or last slice, when the scan cuts an apex or a base).
    border = np.unique(
        np.concatenate([labels[:, [0, -1], :].ravel(), labels[:, :, [0, -1]].ravel()])
    )
    sizes = ndimage.sum_labels(air, labels, index=np.arange(1, count + 1))
    sizes[border[border > 0] - 1] = 0
    keep = [i + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] > 0]
    if not keep:
        raise ValueError("no enclosed air (lungs) in the scan")
    mask = sitk.GetImageFromArray(np.isin(labels, keep).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def register_rigid(current: Volume, prior: Volume) -> RigidTransform:
    """Register ``prior`` onto ``current`` on the lungs, rigidly.

    Parameters
    ----------
    current : Volume
        Today's CT (the fixed image).
    prior : Volume
        The earlier CT (the moving image).

    Returns
    -------
    RigidTransform
        Current-scan points to prior-scan points.

    Raises
    ------
    ValueError
        If either scan shows no lungs (no enclosed air).
    """
    fixed, moving = _coarse(_image(current)), _coarse(_image(prior))
    fixed_lungs, moving_lungs = lung_mask(fixed), lung_mask(moving)
    # Start from the lung centroids: a shift of centimetres is then no problem.
    initial = sitk.CenteredTransformInitializer(
        fixed_lungs,
        moving_lungs,
        sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricFixedMask(sitk.BinaryDilate(fixed_lungs, (2, 2, 2)))
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed, moving)
    euler = sitk.Euler3DTransform(initial)
    rotation = np.asarray(euler.GetMatrix(), dtype=float).reshape(3, 3)
    center = np.asarray(euler.GetCenter(), dtype=float)
    shift = np.asarray(euler.GetTranslation(), dtype=float)
    # ITK: T(x) = R (x - c) + c + t, i.e. R x + (c + t - R c).
    translation = center + shift - rotation @ center
    return RigidTransform(rotation, translation, float(method.GetMetricValue()))
