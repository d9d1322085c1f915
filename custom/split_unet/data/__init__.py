"""Data: phantoms, NIfTI readers (MSD Task01, BraTS 2021 and 2023+), vertical partition, per-site loading, regions."""

from split_unet.data.partition import DATALIST, SERVER_SITE, holdings, partition_dataset
from split_unet.data.phantom import (
    RELEASE_SHAPE,
    RELEASES,
    anatomy,
    generate_dataset,
    generate_patient,
    generate_release,
)
from split_unet.data.readers import (
    Case,
    ImageRef,
    find_cases,
    grid_spacing,
    label_to_source,
    load_case,
    load_image,
    load_label,
    read_label,
    read_volume,
    write_nifti,
)
from split_unet.data.regions import CONVENTIONS, MODALITIES, REGION_NAMES, label_from_regions, nest_regions, regions
from split_unet.data.site_data import SiteImages, SiteLabels, split_patients

__all__ = [
    "CONVENTIONS",
    "DATALIST",
    "MODALITIES",
    "REGION_NAMES",
    "RELEASES",
    "RELEASE_SHAPE",
    "SERVER_SITE",
    "Case",
    "ImageRef",
    "SiteImages",
    "SiteLabels",
    "anatomy",
    "find_cases",
    "generate_dataset",
    "generate_patient",
    "generate_release",
    "grid_spacing",
    "holdings",
    "label_from_regions",
    "label_to_source",
    "load_case",
    "load_image",
    "load_label",
    "nest_regions",
    "partition_dataset",
    "read_label",
    "read_volume",
    "regions",
    "split_patients",
    "write_nifti",
]
