# ruff: noqa: E501  (HLO lines are long)
"""mlcd_jax.planning.hlo, the reading of a compiled program that the plan reports: kernels and their
launches per step (loops by trip count), bytes moved (slices and in-place updates as what they
touch), collectives and their payload, the largest temporaries of a buffer assignment."""

from mlcd_jax.planning import hlo

# A step whose loop runs 12 times: a fusion that reads one layer of a stacked f32[12,1024]
# weight and writes one layer of a stacked output in place; a cuBLAS call with its workspace; an
# all-reduce; a loop of unknown length.
PROGRAM = """
HloModule jit_step

%fused_slice (param_0: f32[12,1024], param_1: s32[], param_2: f32[12,1024]) -> f32[12,1024] {
  %param_0 = f32[12,1024]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %param_2 = f32[12,1024]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %layer = f32[1,1024]{1,0} dynamic-slice(%param_0, %param_1, %zero), dynamic_slice_sizes={1,1024}
  %double = f32[1,1024]{1,0} add(%layer, %layer)
  ROOT %out = f32[12,1024]{1,0} dynamic-update-slice(%param_2, %double, %param_1, %zero)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], f32[12,1024], f32[12,1024])) -> (s32[], f32[12,1024], f32[12,1024]) {
  %p = (s32[], f32[12,1024]{1,0}, f32[12,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[12,1024]{1,0} get-tuple-element(%p), index=1
  %acc = f32[12,1024]{1,0} get-tuple-element(%p), index=2
  %step = f32[12,1024]{1,0} fusion(%w, %i, %acc), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/layer"}
  %mm = (bf16[256,256]{1,0}, s8[4194304]{0}) custom-call(%w, %w), custom_call_target="__cublas$lt$matmul"
  %ar = f32[12,1024]{1,0} all-reduce(%step), replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[12,1024]{1,0}, f32[12,1024]{1,0}) tuple(%i, %w, %ar)
}

%cond (p: (s32[], f32[12,1024], f32[12,1024])) -> pred[] {
  %p = (s32[], f32[12,1024]{1,0}, f32[12,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (w: f32[12,1024], acc: f32[12,1024]) -> f32[12,1024] {
  %w = f32[12,1024]{1,0} parameter(0)
  %acc = f32[12,1024]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[12,1024]{1,0}, f32[12,1024]{1,0}) tuple(%zero, %w, %acc)
  %loop = (s32[], f32[12,1024]{1,0}, f32[12,1024]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %other = (s32[], f32[12,1024]{1,0}, f32[12,1024]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %res = f32[12,1024]{1,0} get-tuple-element(%loop), index=2
}
"""


def test_kernels_launches_bytes_and_collectives_per_step():
    program = hlo.Program(PROGRAM)
    s = program.summary()
    assert s["fusions"] == 2 and s["library_calls"] == 2  # both loops' bodies, each once
    assert s["library_targets"] == {"__cublas$lt$matmul": 2}
    assert s["loops_of_unknown_length"] == 1
    # 12 + 1 runs of each body kernel, (12 + 1) + (1 + 1) of the condition's compare
    step = next(k for k in program.kernels if k.name == "step" and k.launches == 12)
    # one 4 KiB layer read (not the 48 KiB stack), the 4-byte index, one layer written in place
    assert step.bytes == 4096 + 4 + 4096
    assert step.op_name == "jit(step)/layer"
    mm = next(k for k in program.kernels if k.name == "mm" and k.launches == 12)
    assert mm.bytes == 2 * 48 * 1024 + 256 * 256 * 2  # its inputs and output, not the workspace
    assert s["collectives"] == {"all-reduce": {"count": 13.0, "bytes": 13.0 * 48 * 1024}}
    assert s["launches_per_step"] == 2 * 13 + 15  # the fusion and cuBLAS; the compare


def test_shape_bytes_of_tuples_and_scalars():
    assert hlo.shape_bytes("(s32[], bf16[2,3]{1,0}, /*index=2*/pred[4]{0})") == 4 + 12 + 4
    assert hlo.array_shapes("(f32[1,2]{1,0}, u8[0]{0})") == ["f32[1,2]", "u8[0]"]


ASSIGNMENT = """BufferAssignment:
allocation 0: size 4096, parameter 0, shape |f32[1024]| at ShapeIndex {}:
 value: <1 w @0> (size=4096,offset=0): f32[1024]{0}
allocation 1: size 3000, preallocated-temp:
 value: <2 big @0> (size=2000,offset=0): f32[500]{0}
 value: <3 reuse @0> (size=2000,offset=0): f32[500]{0}
 value: <4 small @0> (size=1000,offset=2000): bf16[500]{0}
 value: <5 pair @0> (size=16,offset=2048): (f32[500]{0}, bf16[500]{0})
"""


def test_largest_temporaries_are_slots_of_the_temporary_allocation():
    top = hlo.largest_temporaries(ASSIGNMENT, 5, {"big": "jit(step)/scatter-add"})
    assert [t["bytes"] for t in top] == [2000, 1000]  # the parameter is not a temporary
    assert top[0]["shapes"] == ["2× f32[500]"] and top[0]["source"] == "jit(step)/scatter-add"
    assert top[1]["shapes"] == ["bf16[500]"]
