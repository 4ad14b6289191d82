import sys
sys.path.insert(0, "/work/main/tests")
from hypothesis import HealthCheck, given, settings
import test_attention as ta
import test_nn as tn

inner = ta.test_op_random_combinations_match_the_reference.hypothesis.inner_test
test_fuzz_op = settings(max_examples=250  # 700 in the second run (seed 777, -k fuzz_op), deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))(given(call=ta.op_calls())(inner))
inner_mha = tn.test_multihead_attention_random_calls_match_torch.hypothesis.inner_test
test_fuzz_mha = settings(max_examples=300, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))(given(call=tn.multihead_attention_calls())(inner_mha))
inner_tr = tn.test_transformer_modules_random_calls_match_torch.hypothesis.inner_test
test_fuzz_transformer = settings(max_examples=300, deadline=None, database=None,
                                 suppress_health_check=list(HealthCheck))(given(call=tn.transformer_calls())(inner_tr))
