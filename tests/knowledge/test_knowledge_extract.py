"""Concept extraction: matching, inflections, abbreviations, false-hit guards, negation and uncertainty."""

from __future__ import annotations


import numpy as np
import pytest

from clipmed.errors import ClipmedError
from clipmed.knowledge import ConceptExtractor, Vocabulary, extract, label_vector


@pytest.fixture(scope="module")
def ex() -> ConceptExtractor:
    return ConceptExtractor(Vocabulary.default())


# ----------------------------------------------------------------------------------------------- vocabulary
def test_default_vocabulary_is_large_and_grouped():
    vocab = Vocabulary.default()
    assert len(vocab) >= 40
    assert len(vocab.concepts) == len(set(vocab.concepts))
    for needed in ["mass", "fracture", "effusion", "hemorrhage", "pneumothorax", "calcification", "cyst",
                   "stenosis", "aneurysm", "abscess", "edema", "metastasis"]:
        assert needed in vocab.group("finding")
    assert {"ct", "mri", "xray", "ultrasound", "angiography", "nuclear"} <= set(vocab.group("modality"))
    assert {"chest", "abdomen", "head_neck", "extremity", "pelvis", "dental", "spine"} <= set(vocab.group("region"))


# ------------------------------------------------------------------------------------------------- matching
@pytest.mark.parametrize(
    "text, concepts",
    [
        ("Multiple rib fractures on the left.", {"fracture", "chest"}),
        ("The fractured femur was fixed with screws.", {"fracture", "extremity", "device"}),
        ("Dense calcifications in the wall.", {"calcification"}),
        ("A calcified nodule in the right upper lobe.", {"calcification", "nodule", "lung", "chest"}),
        ("Hepatic metastases.", {"metastasis", "liver", "abdomen"}),
        ("Thrombi in both iliac arteries.", {"thrombosis", "vessel"}),
        ("Two renal cysts.", {"cyst", "kidney", "abdomen"}),
        ("Bilateral pleural effusions.", {"effusion", "chest"}),
        ("Collapsed L1 and L2 vertebrae.", {"spine"}),
        ("Acute pancreatitis.", {"abdomen", "inflammation"}),
    ],
)
def test_synonyms_and_inflections(ex, text, concepts):
    assert concepts <= set(ex.weights(text)), ex.weights(text)


@pytest.mark.parametrize(
    "text, modality",
    [
        ("Axial CT of the abdomen.", "ct"),
        ("Contrast-enhanced CTs were obtained.", "ct"),
        ("Computed tomography scan.", "ct"),
        ("Brain MRI, FLAIR sequence.", "mri"),
        ("Sagittal T2-weighted MR image.", "mri"),
        ("Abdominal US showed gallstones.", "ultrasound"),
        ("Transvaginal ultrasonography.", "ultrasound"),
        ("FDG PET/CT shows uptake.", "nuclear"),
        ("PA CXR on admission.", "xray"),
        ("Plain X-ray of the wrist.", "xray"),
        ("Xray of the wrist.", "xray"),
        ("Digital subtraction angiography.", "angiography"),
    ],
)
def test_modalities_and_abbreviations(ex, text, modality):
    assert modality in ex.weights(text)


def test_pet_ct_gives_both_modalities(ex):
    assert {"nuclear", "ct"} <= set(ex.weights("PET/CT of the chest"))


def test_lowercase_us_is_not_ultrasound(ex):
    assert "ultrasound" not in ex.weights("The patient came to us with a swollen knee.")
    assert "ultrasound" not in ex.weights("Let us look at the scan.")
    assert "ultrasound" in ex.weights("Doppler US of the neck.")


def test_lowercase_pet_and_mr_are_not_modalities(ex):
    weights = ex.weights("Mr Smith was bitten by his pet.")
    assert "nuclear" not in weights and "mri" not in weights


def test_femoral_head_is_extremity_not_head_and_neck(ex):
    weights = ex.weights("Avascular necrosis of the femoral head.")
    assert "extremity" in weights and "head_neck" not in weights
    assert "head_neck" not in ex.weights("Fracture of the head of the femur.")
    assert "head_neck" in ex.weights("Head CT without contrast.")


def test_other_region_guards(ex):
    assert "chest" not in ex.weights("Sagittal MRI of the thoracic spine.")
    assert "spine" in ex.weights("Sagittal MRI of the thoracic spine.")
    assert "pelvis" not in ex.weights("Dilated renal pelvis.")
    assert "head_neck" not in ex.weights("Fracture of the femoral neck.")
    assert "abdomen" in ex.weights("Mass in the head of the pancreas.")


def test_mass_effect_is_not_a_mass(ex):
    assert "mass" not in ex.weights("Hematoma with mass effect on the ventricles.")
    assert "mass" in ex.weights("Large mass with mass effect.")


def test_word_boundaries(ex):
    assert "chest" not in ex.weights("Manchester study")
    assert "extremity" not in ex.weights("The armamentarium of the surgeon")
    assert "mass" not in ex.weights("Massive hemoptysis")


def test_longest_multiword_synonym_and_hyphen_variants(ex):
    for text in ("x-ray", "x ray", "X-Ray", "xray"):
        assert "xray" in ex.weights(text), text
    assert "ct" in ex.weights("computed-tomography")


# -------------------------------------------------------------------------------------------------- negation
@pytest.mark.parametrize(
    "text, concept",
    [
        ("No evidence of fracture.", "fracture"),
        ("Chest X-ray without pneumothorax.", "pneumothorax"),
        ("Blood cultures negative for abscess.", "abscess"),
        ("Aortic dissection was ruled out.", "dissection"),
        ("The lungs are free of metastases.", "metastasis"),
        ("Absence of pleural effusion.", "effusion"),
        ("Hemorrhage is not seen.", "hemorrhage"),
        ("There is no hydronephrosis.", "hydronephrosis"),
        ("CT did not show any fracture.", "fracture"),
        ("Complete resolution of the abscess.", "abscess"),
        ("No pneumothorax, pleural effusion or consolidation.", "consolidation"),
    ],
)
def test_negated_findings_are_omitted(ex, text, concept):
    assert concept not in ex.weights(text), ex.mentions(text)


def test_negation_keeps_regions_and_modalities(ex):
    weights = ex.weights("Chest CT: no pneumothorax.")
    assert "pneumothorax" not in weights
    assert weights["chest"] == 1.0 and weights["ct"] == 1.0
    assert ex.weights("No pneumothorax.") == {"chest": 1.0}  # implied region survives the negation


def test_negation_statuses_are_reported(ex):
    statuses = {m.concept: m.status for m in ex.mentions("No fracture, possible effusion.")}
    assert statuses == {"fracture": "negated", "effusion": "uncertain"}


# ----------------------------------------------------------------------------------------------- uncertainty
@pytest.mark.parametrize(
    "text, concept",
    [
        ("Possible abscess in the right lobe.", "abscess"),
        ("Suspected pneumothorax.", "pneumothorax"),
        ("Probable metastasis.", "metastasis"),
        ("A small fracture cannot be excluded.", "fracture"),
        ("The lesion may represent a cyst.", "cyst"),
        ("Findings suggestive of edema.", "edema"),
        ("Likely hematoma.", "hematoma"),
        ("?fracture of the distal radius", "fracture"),
        ("Is there a fracture?", "fracture"),
        ("Stenosis cannot be ruled out.", "stenosis"),
    ],
)
def test_uncertain_findings_get_lower_weight(ex, text, concept):
    assert ex.weights(text)[concept] == pytest.approx(0.5), ex.mentions(text)


def test_uncertain_weight_is_an_option():
    ex = ConceptExtractor(uncertain_weight=0.3)
    assert ex.weights("Possible abscess.")["abscess"] == pytest.approx(0.3)
    assert extract("Possible abscess.", uncertain_weight=0.25)["abscess"] == pytest.approx(0.25)
    with pytest.raises(ClipmedError):
        ConceptExtractor(uncertain_weight=0.0)


def test_definite_mention_beats_uncertain_and_negated(ex):
    assert ex.weights("Possible abscess. Follow-up CT confirms an abscess.")["abscess"] == 1.0
    assert ex.weights("No fracture on day 1. Fracture on day 3.")["fracture"] == 1.0


# ---------------------------------------------------------------------------------------------- scope ends
@pytest.mark.parametrize(
    "text, negated, kept",
    [
        ("No fracture, but a large effusion.", "fracture", "effusion"),
        ("No pneumothorax; small effusion.", "pneumothorax", "effusion"),
        ("No hemorrhage. Large infarct in the left MCA territory.", "hemorrhage", "infarction"),
        ("No evidence of fracture, however there is a dislocation.", "fracture", "dislocation"),
        ("CT without contrast showing a large mass.", None, "mass"),
        ("No evidence of pulmonary embolism but there is a thrombus in the vein.", "embolism", "thrombosis"),
    ],
)
def test_scope_ends_at_clause_boundaries(ex, text, negated, kept):
    weights = ex.weights(text)
    if negated:
        assert negated not in weights
    assert weights.get(kept) == 1.0, ex.mentions(text)


def test_scope_has_a_window(ex):
    far = "No contrast agent was injected into the arm before the scan of the large hematoma."
    assert ex.weights(far).get("hematoma") == 1.0
    narrow = ConceptExtractor(window=1)
    assert "effusion" in narrow.weights("No pneumothorax, pleural or pericardial effusion.")


def test_pseudo_triggers_do_not_negate(ex):
    assert ex.weights("No change in the size of the mass.")["mass"] == 1.0
    assert ex.weights("Post-coiling: no filling of the aneurysm.")["aneurysm"] == 1.0


# ---------------------------------------------------------------------------------------------- vectors
def test_vector_and_matrix(ex):
    texts = ["Chest CT with a mass.", "", None, "Possible abscess."]
    mat = ex.matrix(texts)
    assert mat.shape == (4, len(ex.vocab)) and mat.dtype == np.float32
    np.testing.assert_array_equal(mat[0], ex.vector(texts[0]))
    assert not mat[1].any() and not mat[2].any()
    assert mat[3, ex.vocab.index("abscess")] == pytest.approx(0.5)
    assert set(np.unique(mat)) <= {0.0, 0.5, 1.0}


def test_extract_matches_extractor(ex):
    text = "Possible abscess; no fracture. Lung nodule on CT."
    assert extract(text) == ex.weights(text)
    assert "fracture" not in extract(text)


def test_implied_concepts(ex):
    weights = ex.weights("Right lower lobe pneumonia.")
    assert {"pneumonia", "lung", "chest"} <= set(weights)


# ----------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    "label, concepts",
    [
        ("Chest", {"chest"}),
        ("Abdomen", {"abdomen"}),
        ("Head and Neck", {"head_neck"}),
        ("Extremity", {"extremity"}),
        ("Pelvis", {"pelvis"}),
        ("Dental", {"dental"}),
        ("Spine", {"spine"}),
        ("CT", {"ct"}),
        ("ct", {"ct"}),
        ("X-ray", {"xray"}),
        ("MRI", {"mri"}),
        ("Ultrasound", {"ultrasound"}),
        ("Angiography", {"angiography"}),
        ("Nuclear", {"nuclear"}),
        ("Pneumothorax", {"pneumothorax", "chest"}),
    ],
)
def test_label_vector(label, concepts):
    vocab = Vocabulary.default()
    vec = label_vector(label, vocab)
    assert vec.shape == (len(vocab),) and vec.dtype == np.float32
    assert {vocab.concepts[i] for i in np.flatnonzero(vec)} == concepts


def test_label_vector_of_none_and_several_labels(ex):
    assert not ex.label_vector(None).any() and not ex.label_vector("").any()
    vec = ex.label_vector(["Chest", "CT"])
    assert {ex.vocab.concepts[i] for i in np.flatnonzero(vec)} == {"chest", "ct"}


def test_entity_matrix_sources(ex):
    captions = ["Chest X-ray, no pneumothorax.", "Possible abscess.", None]
    labels = ["Chest", None, "Abdomen"]
    cap = ex.entity_matrix(captions, labels, "captions")
    lab = ex.entity_matrix(captions, labels, "labels")
    both = ex.entity_matrix(captions, labels, "both")
    np.testing.assert_array_equal(both, np.maximum(cap, lab))
    assert lab[2, ex.vocab.index("abdomen")] == 1.0 and both[2, ex.vocab.index("abdomen")] == 1.0
    assert both[1, ex.vocab.index("abscess")] == pytest.approx(0.5)
    with pytest.raises(ClipmedError):
        ex.entity_matrix(captions, None, "labels")
    with pytest.raises(ClipmedError):
        ex.entity_matrix(captions, labels, "reports")
