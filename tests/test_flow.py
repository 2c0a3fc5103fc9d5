import pytest
import torch

from model.flow import (FlowEulerSampler, TimestepSampler, flow_loss, interpolate, time_shift, velocity_target)


def test_interpolation_endpoints_and_target():
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.allclose(interpolate(x0, eps, torch.tensor(0.0)), x0)
    assert torch.allclose(interpolate(x0, eps, torch.tensor(1.0)), eps)
    t = torch.rand(5, 1)
    # dx_t/dt is the target velocity
    h = 1e-3
    num = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t)) / h
    assert torch.allclose(num, velocity_target(x0, eps), atol=1e-2)


def test_time_shift_monotone_and_towards_noise():
    t = torch.linspace(0, 1, 101)
    s = time_shift(t, 6.0)
    assert s[0] == 0 and s[-1] == 1
    assert torch.all(s[1:] >= s[:-1])
    assert torch.all(s[1:-1] > t[1:-1])
    assert torch.equal(time_shift(t, 1.0), t)


def test_timestep_sampler_range_and_shift():
    g = torch.Generator().manual_seed(0)
    t1 = TimestepSampler(shift=1.0)(4000, generator=g)
    t8 = TimestepSampler(shift=8.0)(4000, generator=torch.Generator().manual_seed(0))
    assert t1.min() > 0 and t1.max() < 1
    assert abs(float(t1.mean()) - 0.5) < 0.03
    assert float(t8.mean()) > 0.75


def test_euler_sampler_recovers_point_mass_exactly():
    # For data concentrated at x0 the exact velocity is (x_t - x0) / t; Euler integrates it exactly.
    x0 = torch.randn(7, 4)

    def velocity(x, t, cond):
        return (x - x0) / t

    for sampler in (FlowEulerSampler(steps=5, shift=1.0, guidance=1.0), FlowEulerSampler.for_stage("1024")):
        out = sampler.sample(velocity, torch.randn(7, 4))
        assert torch.allclose(out, x0, atol=1e-5)


def test_classifier_free_guidance_combination():
    sampler = FlowEulerSampler(steps=1, guidance=7.0)
    seen = []

    def velocity(x, t, cond):
        seen.append(cond)
        return torch.full_like(x, 1.0 if cond == "c" else 3.0)

    v = sampler.guided_velocity(velocity, torch.zeros(2), torch.tensor(1.0), "c", "u")
    assert seen == ["c", "u"]
    assert torch.allclose(v, torch.full((2,), 3.0 + 7.0 * (1.0 - 3.0)))


def test_stage_defaults_and_errors():
    s = FlowEulerSampler.for_stage("512")
    assert (s.steps, s.shift, s.guidance) == (30, 6.0, 7.0)
    assert FlowEulerSampler.for_stage("dense").steps == 50
    with pytest.raises(ValueError, match="unknown sampler stage"):
        FlowEulerSampler.for_stage("2048")
    ts = FlowEulerSampler(steps=4, shift=3.0).timesteps()
    assert len(ts) == 5 and ts[0] == 1 and ts[-1] == 0


def test_flow_loss_zero_at_target():
    x0, eps = torch.randn(3, 2), torch.randn(3, 2)
    assert float(flow_loss(eps - x0, x0, eps)) == 0.0
    assert float(flow_loss(torch.zeros(3, 2), x0, eps)) > 0


def test_release_schedule_matches_the_released_scheduler():
    from model.flow import FlowEulerSampler, ReleaseSchedule

    diffusers = pytest.importorskip("diffusers")
    for shift, steps in [(1.0, 50), (3.0, 30), (6.0, 15), (8.0, 15)]:
        ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        ref.set_timesteps(steps)
        ours = ReleaseSchedule.from_official({"target": "diffusers.FlowMatchEulerDiscreteScheduler",
                                              "num_train_timesteps": 1000, "shift": shift})
        sampler = FlowEulerSampler(steps=steps, schedule=ours)
        torch.testing.assert_close(sampler.timesteps(), ref.sigmas, rtol=0, atol=0)
        # one Euler step is the scheduler's step
        x, v = torch.randn(4, 8), torch.randn(4, 8)
        ts = sampler.timesteps()
        torch.testing.assert_close(sampler.step(v, x, ts[0], ts[1]), ref.step(v, ref.timesteps[0], x).prev_sample)


def test_release_schedule_rejects_what_it_does_not_do():
    from model.flow import ReleaseSchedule

    with pytest.raises(ValueError, match="unknown scheduler parameter"):
        ReleaseSchedule.from_official({"shfit": 3.0})
    with pytest.raises(ValueError, match="use_dynamic_shifting=True is not supported"):
        ReleaseSchedule.from_official({"use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="only FlowMatchEulerDiscreteScheduler"):
        ReleaseSchedule.from_official({"target": "diffusers.DDIMScheduler"})
