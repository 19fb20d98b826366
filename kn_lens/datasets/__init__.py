"""Built-in fact data, known-fact filtering, fact sampling, edit-set building (new objects included)
and loaders for public formats."""
from kn_lens.datasets.core import Dataset, builtin_dataset, load_dataset
from kn_lens.datasets.edits import (EditSet, build_edit_requests, draw_new_object, edit_request,
                                    new_objects, random_prefixes)
from kn_lens.datasets.sampling import FactSample, sample_facts
from kn_lens.datasets.known import KnownFacts, KnownFactsConfig, RelationSummary, known_facts, score_queries
from kn_lens.datasets.userfile import check_relations_file, load_relations_file
from kn_lens.datasets.loaders import (
    KNOWEDIT_UNKNOWN, load_counterfact, load_knowedit, load_pararel, pararel_pattern_to_template,
)

__all__ = [
    "Dataset", "builtin_dataset", "load_dataset",
    "KnownFacts", "KnownFactsConfig", "RelationSummary", "known_facts", "score_queries",
    "EditSet", "build_edit_requests", "draw_new_object", "edit_request", "new_objects",
    "random_prefixes", "FactSample", "sample_facts",
    "load_pararel", "load_counterfact", "load_knowedit", "pararel_pattern_to_template",
    "KNOWEDIT_UNKNOWN", "check_relations_file", "load_relations_file",
]
