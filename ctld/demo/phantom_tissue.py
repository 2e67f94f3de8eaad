"""What the phantom is made of: the tissue labels and the nominal HU of each material."""

from __future__ import annotations

import enum

HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT stores


class Tissue(enum.IntEnum):
    """Label of the material painted last (with more than half coverage) at each voxel."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    SOFT_TISSUE = 4  # mediastinum, myocardium, oesophagus, airway walls, cartilage, liver, stomach
    BLOOD = 5  # contrast-filled heart chambers and vessels
    BONE = 6  # cancellous bone
    CORTEX = 7  # cortical bone
    NODULE = 8
    EMBOLUS = 9
    AIRWAY = 10  # air in the trachea, bronchi and stomach
    TABLE = 11


# Nominal HU of each material (before partial volume, blur and noise).
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 45.0,
    "lung": -850.0,
    "mediastinum": -80.0,  # mediastinal fat with strands
    "soft": 40.0,
    "myocardium": 55.0,
    "liver": 65.0,
    "cartilage": 110.0,
    "disc": 80.0,
    "csf": 15.0,
    "artery": 330.0,  # CTPA phase: right heart and pulmonary arteries brightest
    "vein": 210.0,  # pulmonary veins, left heart, aorta
    "svc": 600.0,  # undiluted contrast in the superior vena cava
    "bone": 650.0,
    "cortex": 1200.0,
    "embolus": 45.0,
    "table_shell": 250.0,
    "table_core": -750.0,
}
