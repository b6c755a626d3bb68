"""Data layer: the site-directory format, the procedural benchmark, converters and episodes.

* :mod:`common.data.schema`: modalities (:class:`ModalitySpec`) and the batch layout.
* :mod:`common.data.site`: write, load and validate site directories.
* :mod:`common.data.procedural`: the default multimodal few-shot benchmark (no download).
* :mod:`common.data.converters`: Omniglot and LEAF FEMNIST to site directories.
* :mod:`common.data.importers`: class folders of images and WAV audio, and per-modality arrays, to sites.
* :mod:`common.data.schema_inference`: the schema from a schema file or the sites' manifests.
* :mod:`common.data.site_report`: what a site holds and which episodes it serves (``metafed check-site``).
* :mod:`common.data.episodes`: N-way K-shot and Poisson-sampled episodes as batches.
"""

from common.data.converters import FEMNIST_CLASSES, convert_femnist, convert_omniglot
from common.data.episodes import eligible_classes, sample_episodes, sample_poisson_episodes
from common.data.importers import import_arrays, import_class_folders
from common.data.procedural import (
    BENCHMARK_FILE,
    PROCEDURAL_SCHEMA,
    BenchmarkPaths,
    benchmark_paths,
    ensure_benchmark,
    generate_benchmark,
    load_benchmark_schema,
)
from common.data.schema import KINDS, ModalitySpec, Schema
from common.data.schema_inference import infer_schema, read_schema_file
from common.data.site import (
    FORMAT_VERSION,
    SiteData,
    SiteDataError,
    list_sites,
    load_site,
    read_manifest,
    write_site,
)

__all__ = [
    "KINDS",
    "ModalitySpec",
    "Schema",
    "FORMAT_VERSION",
    "SiteData",
    "SiteDataError",
    "write_site",
    "load_site",
    "list_sites",
    "read_manifest",
    "PROCEDURAL_SCHEMA",
    "BENCHMARK_FILE",
    "BenchmarkPaths",
    "generate_benchmark",
    "ensure_benchmark",
    "load_benchmark_schema",
    "benchmark_paths",
    "convert_omniglot",
    "convert_femnist",
    "FEMNIST_CLASSES",
    "import_class_folders",
    "import_arrays",
    "infer_schema",
    "read_schema_file",
    "sample_episodes",
    "sample_poisson_episodes",
    "eligible_classes",
]
