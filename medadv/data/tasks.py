"""The task registry: the paper's three problems (plus pneumothorax), diabetic retinopathy grading, and how
raw labels become the task's classes.

A task names its kind (:mod:`medadv.kinds`): binary tasks have class 0 healthy and class 1 the disease;
multi-class tasks have K classes, ordered by severity when ``graded``; multi-label tasks name their
findings (``class_names``), one 0/1/unknown label each. ``sources`` lists where the images
come from, in order of preference: the first one present under the data root is used; when none is,
the last one (an official MedMNIST file) is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medadv.errors import MedadvError

EXCLUDED = -1  # a raw label outside the binary task (e.g. seborrheic keratosis for melanoma vs nevus)
FULL_RESOLUTION_FROM = 64  # a network input above this many pixels prefers a task's full-resolution folder


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    modality: str  # chest-xray | fundus | dermoscopy: picks the training augmentation
    class_names: tuple[str, ...]
    sources: tuple[str, ...]  # "medmnist:<flag>" or "folder:<dir under the data root>"
    binarize: Callable[[np.ndarray], np.ndarray]  # raw MedMNIST labels (N×K) -> {0..classes-1, EXCLUDED}
    note: str = ""
    kind: str = "binary"  # a registered task kind (medadv.kinds)
    graded: bool = False  # ordinal classes (grades): quadratic-weighted kappa is reported
    positive_from: int | None = None  # multi-class: the clinically first decision, class >= this (referable)
    # full-resolution folders, preferred when present for a network input above FULL_RESOLUTION_FROM px:
    # a 224 px network then reads 224 px images instead of 28 px thumbnails upsampled
    full_resolution: tuple[str, ...] = ()
    # multi-label: what a finding's -1 ("uncertain") means (medadv.data.folder.UNCERTAIN_POLICIES)
    uncertain: str = "ignore"
    # segmentation: the labels are per-pixel masks, read from labels.csv's mask column (medadv.data.masks)
    masks: bool = False
    # 3D: the images are N×1×D×H×W volumes (MedMNIST 3D npz files, or a folder of NIfTI files)
    volumes: bool = False
    # the MedMNIST file resolution this task reads (None: the smallest one >= the network's input)
    file_size: int | None = None

    @property
    def classes(self) -> int:
        return len(self.class_names)


def _identity(raw: np.ndarray) -> np.ndarray:
    return raw[:, 0].astype(np.int64)


def _dr_referable(raw: np.ndarray) -> np.ndarray:
    return (raw[:, 0] >= 2).astype(np.int64)  # referable DR: moderate NPDR (grade 2) or worse


def _pneumothorax(raw: np.ndarray) -> np.ndarray:
    if raw.shape[1] != 14:
        raise MedadvError(f"ChestMNIST labels have 14 columns; got {raw.shape[1]}.", "use the official chestmnist file.")
    pneumothorax = raw[:, 7] == 1
    no_finding = raw.sum(axis=1) == 0
    return np.where(pneumothorax, 1, np.where(no_finding, 0, EXCLUDED)).astype(np.int64)


# NIH ChestX-ray14's findings in NIH's order, which is ChestMNIST's label order too
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


def _findings(raw: np.ndarray) -> np.ndarray:
    return raw.astype(np.int64)  # N×14, already one 0/1 column per finding


def _melanoma_vs_nevus(raw: np.ndarray) -> np.ndarray:
    return np.select([raw[:, 0] == 4, raw[:, 0] == 5], [1, 0], EXCLUDED).astype(np.int64)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("fundus-dr", "Referable diabetic retinopathy (fundus)", "fundus", ("no referable DR", "referable DR"),
             ("medmnist:retinamnist",), _dr_referable, "RetinaMNIST grades 0-4; referable = grade >= 2."),
        Task("fundus-grade", "Diabetic retinopathy grade (fundus)", "fundus",
             ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR"),
             ("medmnist:retinamnist",), _identity,
             "RetinaMNIST's own grades 0-4 (ICDR scale); referable DR = grade >= 2 is reported beside them.",
             kind="multiclass", graded=True, positive_from=2),
        Task("chest-xray", "Pneumonia (chest X-ray)", "chest-xray", ("normal", "pneumonia"),
             ("medmnist:pneumoniamnist",), _identity,
             "PneumoniaMNIST stands in for the paper's pneumothorax task (pediatric pneumonia); above 64 px the "
             "same X-rays at 224 px (pneumonia-224, Kermany et al. 2018) when present.",
             full_resolution=("folder:pneumonia-224",)),
        Task("chest-pneumothorax", "Pneumothorax (chest X-ray)", "chest-xray", ("no finding", "pneumothorax"),
             ("medmnist:chestmnist",), _pneumothorax,
             "ChestMNIST (NIH ChestX-ray14): pneumothorax vs no finding, other findings excluded, as in the paper."),
        Task("chest-findings", "Chest X-ray findings (multi-label, NIH ChestX-ray14)", "chest-xray", NIH_FINDINGS,
             ("folder:nih-cxr14-1000", "medmnist:chestmnist"), _findings,
             "NIH ChestX-ray14's 14 findings, one sigmoid each (the paper's own dataset): the 1,000-image folder "
             "when present, else ChestMNIST. An image with no finding reads 'No Finding'.", kind="multilabel"),
        Task("derm-melanoma", "Melanoma vs nevus (dermoscopy)", "dermoscopy", ("nevus", "melanoma"),
             ("folder:isic2017", "medmnist:dermamnist"), _melanoma_vs_nevus,
             "ISIC 2017 folder when present, else DermaMNIST classes melanoma (4) vs melanocytic nevi (5)."),
        Task("lung-seg", "Lung segmentation (chest X-ray, Shenzhen)", "chest-xray", ("background", "lung"),
             ("folder:shenzhen-cxr-256",), _identity,
             "Shenzhen chest X-rays (566, 256 px) with lung masks (Stirenko et al. 2018); no split column, so a "
             "seeded patient-level 70/10/20 split stratified by the tuberculosis label (one image per patient).",
             kind="segmentation", masks=True),
        Task("adrenal3d", "Adrenal mass (3D CT shape masks, 28³)", "ct-volume", ("normal", "adrenal mass"),
             ("medmnist:adrenalmnist3d",), _identity,
             "AdrenalMNIST3D (MedMNIST v2): 28³ binary shape masks of adrenal glands from abdominal CT, stored 0/255 "
             "(not CT intensities); label 1 adrenal mass. A folder of NIfTI volumes with labels.csv reads too.",
             volumes=True, file_size=28),
        Task("adrenal3d-64", "Adrenal mass (3D CT shape masks, 64³)", "ct-volume", ("normal", "adrenal mass"),
             ("medmnist:adrenalmnist3d",), _identity,
             "AdrenalMNIST3D at 64³ (MedMNIST+ adrenalmnist3d_64.npz): the same volumes as adrenal3d.",
             volumes=True, file_size=64),
    )
}


# labels.csv columns that are never findings (``--findings all`` takes every other column)
# (case-insensitive; CheXpert's "No Finding" is the absence of the others, not a finding of its own)
RESERVED_COLUMNS = ("path", "label", "split", "patient_id", "class_name", "mask", "study_id", "view", "sex", "age",
                    "frontal/lateral", "ap/pa", "no finding", "no_finding")
MAX_FINDINGS = 256


def with_findings(task: Task, findings: tuple[str, ...] | None = None, uncertain: str | None = None) -> Task:
    """``task`` reading the finding columns ``findings`` (a multi-label task's own when None) and treating a
    -1 label by ``uncertain`` (its own when None). The names must be distinct, non-empty and not reserved
    columns; for the task's MedMNIST source they must be among its own findings (the npz's columns are
    picked by name). A binary or multi-class task takes neither."""
    from dataclasses import replace

    if findings is None and uncertain is None:
        return task
    if task.kind != "multilabel":
        flag = "--findings" if findings is not None else "--uncertain"
        raise MedadvError(f"{flag} applies to multi-label tasks; {task.name} is {task.kind}.",
                          f"leave {flag} out, or pick a multi-label task such as chest-findings.")
    if uncertain is not None:
        from medadv.data.folder import UNCERTAIN_POLICIES

        if uncertain not in UNCERTAIN_POLICIES:
            raise MedadvError(f"uncertain-label policy '{uncertain}' is not one of {', '.join(UNCERTAIN_POLICIES)}.",
                              "pass --uncertain ignore, zeros or ones.")
        task = replace(task, uncertain=uncertain)
    if findings is None or tuple(findings) == task.class_names:
        return task
    names = tuple(findings)
    if not names or len(names) > MAX_FINDINGS:
        raise MedadvError(f"--findings names {len(names)} findings; a reader needs 1 to {MAX_FINDINGS}.",
                          "pass the finding columns comma-separated, e.g. --findings Effusion,Pneumothorax.")
    blank = [n for n in names if not n or n != n.strip()]
    dup = sorted({n for n in names if names.count(n) > 1})
    reserved = [n for n in names if n.lower() in RESERVED_COLUMNS]
    if blank or dup or reserved:
        what = ("a blank name" if blank else f"{', '.join(dup)} twice" if dup else
                f"the reserved column{'s' if len(reserved) > 1 else ''} {', '.join(reserved)}")
        raise MedadvError(f"--findings names {what}.", "name each finding column once, e.g. --findings Effusion,Mass.")
    own = {n: i for i, n in enumerate(task.class_names)}
    base = task.binarize
    if all(n in own for n in names):
        columns = [own[n] for n in names]

        def pick(raw: np.ndarray) -> np.ndarray:
            return base(raw)[:, columns]  # an npz's columns by name, in the order asked
    else:
        absent = [n for n in names if n not in own]

        def pick(raw: np.ndarray) -> np.ndarray:
            raise MedadvError(f"the {task.name} npz has no finding {', '.join(absent)} (its findings: "
                              f"{', '.join(task.class_names)}).", "read a folder whose labels.csv has those columns.")
    return replace(task, class_names=names, binarize=pick)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise MedadvError(f"unknown task '{name}'.", f"choose one of {', '.join(TASKS)}.") from None
