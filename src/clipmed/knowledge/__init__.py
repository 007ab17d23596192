"""Knowledge extraction (MedCLIP): medical concepts from captions and labels as multi-hot entity vectors.

The semantic-matching objective compares these vectors between images and texts, so that two pairs that
mention the same findings are not pushed apart as false negatives.
"""

from clipmed.knowledge.coverage import coverage, format_coverage
from clipmed.knowledge.extract import ENTITY_SOURCES, ConceptExtractor, Mention, extract, label_vector
from clipmed.knowledge.prompts import check_template, load_templates
from clipmed.knowledge.vocabulary import GROUPS, Concept, Vocabulary

__all__ = [
    "ENTITY_SOURCES",
    "GROUPS",
    "Concept",
    "ConceptExtractor",
    "Mention",
    "Vocabulary",
    "check_template",
    "coverage",
    "extract",
    "format_coverage",
    "label_vector",
    "load_templates",
]
